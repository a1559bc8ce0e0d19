"""What a person does on the web page, in a real Chromium against the real stack: upload a
photo, watch it being made, turn the model around, download it, cancel, read errors, browse
their models, and do all of it with the keyboard alone."""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trimesh
from PIL import Image

from tests.support.images import object_photo
from tests.support.stack import ROOT, Stack

pytestmark = pytest.mark.slow

RESULT_TIMEOUT = 120_000  # ms: a generation on a busy 2-core machine


def choose_backend(page: Any, name: str) -> None:
    page.click("#advanced summary")
    page.select_option("#opt-backend", name)


def current_task_id(page: Any) -> str:
    match = re.search(r"#/task/([0-9a-f-]+)$", page.url)
    assert match, page.url
    return match.group(1)


def wait_for_model(page: Any) -> None:
    page.wait_for_selector("#result-panel:not([hidden])", timeout=RESULT_TIMEOUT)
    page.wait_for_function(
        "() => document.querySelector('model-viewer')?.loaded === true", timeout=60_000
    )


def assert_model_drawn(page: Any) -> None:
    """The viewer's own render has the object in it: many opaque pixels, not one flat colour."""
    data_url = page.evaluate("() => document.querySelector('model-viewer').toDataURL('image/png')")
    image = Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))).convert("RGBA")
    pixels = np.asarray(image).astype(float)
    opaque = pixels[..., 3] > 200
    assert opaque.mean() > 0.03, f"only {opaque.mean():.1%} of the viewer shows the model"
    assert pixels[opaque][:, :3].std() > 5, "the model is drawn as one flat colour"
    # The toy is red: the rendered model must be too (texture applied, lit).
    red = pixels[opaque]
    assert (red[:, 0] - red[:, 1]).mean() > 30


def test_upload_progress_result_and_download(
    page: Any, stack: Stack, photo: Path, screenshots: Path, tmp_path: Path
) -> None:
    page.screenshot(path=str(screenshots / "empty.png"))
    page.set_input_files("#file-input", str(photo))
    page.wait_for_selector("#photo-list img")
    choose_backend(page, "fake-slow")  # ~6 s of reported progress before the real CPU work
    page.screenshot(path=str(screenshots / "photo-selected.png"), full_page=True)
    page.click("#generate-button")

    page.wait_for_selector("#progress-panel:not([hidden])")
    page.wait_for_function("() => document.querySelector('#progress-bar').value > 0")
    status = page.inner_text("#progress-status")
    assert status and "fake" not in status.lower()  # stage names in words, not identifiers
    assert re.fullmatch(r"\d+%", page.inner_text("#progress-percent"))
    assert page.get_attribute("#progress-status", "aria-live") == "polite"
    page.click(".timeline-box summary")
    page.wait_for_selector("#timeline li")
    page.wait_for_function("() => document.querySelector('#progress-bar').value >= 15")
    page.screenshot(path=str(screenshots / "progress.png"))

    wait_for_model(page)
    page.wait_for_timeout(500)  # let a frame or two draw
    assert_model_drawn(page)
    assert page.inner_text("#task-title") == "Your 3D model"

    viewer = page.locator("model-viewer")
    assert viewer.get_attribute("ar") is not None
    assert viewer.get_attribute("camera-controls") is not None
    page.click("#rotate-toggle")
    assert page.get_attribute("#rotate-toggle", "aria-pressed") == "false"
    assert page.evaluate("() => document.querySelector('model-viewer').autoRotate") is False
    page.click("#reset-camera")
    page.wait_for_timeout(1500)  # the camera glides back to the front
    page.screenshot(path=str(screenshots / "result.png"), full_page=True)
    page.check('input[name="viewer-bg"][value="dark"]', force=True)
    assert "bg-dark" in (page.get_attribute("#viewer-stage", "class") or "")

    with page.expect_download() as download_info:
        page.click('#downloads [data-format="glb"]')
    glb_path = tmp_path / "model.glb"
    download_info.value.save_as(glb_path)
    assert download_info.value.suggested_filename.endswith(".glb")
    mesh = trimesh.load(glb_path, file_type="glb", force="mesh")
    assert len(mesh.faces) > 100

    # A format not asked for at submit time is made on request.
    with page.expect_download() as download_info:
        page.click('#downloads [data-format="stl"]')
    stl_path = tmp_path / "model.stl"
    download_info.value.save_as(stl_path)
    assert len(trimesh.load(stl_path, file_type="stl").faces) > 100


def test_keyboard_only_upload(page: Any, photo: Path, screenshots: Path) -> None:
    """Tab to the drop zone, Enter opens the file picker, Tab to Generate, Enter."""

    def tab_to(selector: str) -> None:
        for _ in range(30):
            page.keyboard.press("Tab")
            if page.evaluate(f"() => document.activeElement.matches({selector!r})"):
                return
        raise AssertionError(f"{selector} cannot be reached with Tab")

    # Playwright turns on file-chooser interception when the first listener is added, which
    # takes a round trip: do it before any key press could open the picker.
    page.on("filechooser", lambda chooser: None)
    page.wait_for_timeout(200)
    tab_to("#dropzone")
    # The focus ring is visible (not removed by CSS).
    assert page.evaluate("() => getComputedStyle(document.activeElement).outlineStyle") not in (
        "none",
        "",
    )
    with page.expect_file_chooser() as chooser:
        page.keyboard.press("Enter")
    chooser.value.set_files(str(photo))
    page.wait_for_selector("#photo-list img")
    tab_to("#generate-button")
    page.keyboard.press("Enter")
    wait_for_model(page)
    # Focus moved to the new view's heading, so a screen reader announces where we are.
    assert page.evaluate("() => document.activeElement.id") == "task-title"
    page.set_viewport_size({"width": 390, "height": 844})
    page.wait_for_timeout(300)
    page.screenshot(path=str(screenshots / "result-phone.png"))


def test_paste_and_drop_add_photos(page: Any, photo: Path) -> None:
    """Ctrl-V of an image and a file dropped on the page both add a photo."""
    data = list(photo.read_bytes())
    add = """([kind, bytes]) => {
        const transfer = new DataTransfer();
        transfer.items.add(new File([new Uint8Array(bytes)], kind + ".png", {type: "image/png"}));
        const event = kind === "pasted"
            ? new ClipboardEvent("paste", {clipboardData: transfer, bubbles: true})
            : new DragEvent("drop", {dataTransfer: transfer, bubbles: true, cancelable: true});
        const target = kind === "pasted" ? document.body : document.querySelector("#dropzone");
        target.dispatchEvent(event);
    }"""
    page.evaluate(add, ["pasted", data])
    page.wait_for_selector("#photo-list img")
    page.evaluate(add, ["dropped", data])
    page.wait_for_function("() => document.querySelectorAll('#photo-list img').length === 2")
    names = page.locator(".photo-name").all_inner_texts()
    assert names == ["pasted.png", "dropped.png"]
    assert "2 photos ready" in page.inner_text("#generate-hint")


def test_queue_position_and_cancel(page: Any, stack: Stack, photo: Path, screenshots: Path) -> None:
    """A model waiting behind another shows its place in line; Cancel stops a running one."""
    with stack.client() as client:
        # One running and one queued: ours is second in line (queue_position counts the
        # queued tasks before it).
        ahead = [
            client.post(
                "/api/v1/generate",
                files={"image": ("toy.png", photo.read_bytes(), "image/png")},
                data={"options": '{"backend": "fake-slow"}'},
            ).json()
            for _ in range(2)
        ]
        stack.wait_for_task(client, ahead[0]["id"], until=("running",))
        page.set_input_files("#file-input", str(photo))
        choose_backend(page, "fake-slow")
        page.click("#generate-button")
        page.wait_for_selector("#queue-fact:not([hidden])")
        assert "number 2" in page.inner_text("#progress-status")
        assert page.inner_text("#progress-queue") == "2"
        page.screenshot(path=str(screenshots / "queued.png"))
        for task in ahead:
            client.post(f"/api/v1/task/{task['id']}/cancel")

    page.wait_for_function(
        "() => document.querySelector('#progress-bar').value > 0", timeout=RESULT_TIMEOUT
    )
    task_id = current_task_id(page)
    page.click("#cancel-button")
    page.wait_for_selector("#task-error:not([hidden])")
    assert page.inner_text("#task-title") == "Canceled"
    with stack.client() as client:
        assert client.get(f"/api/v1/task/{task_id}").json()["status"] == "canceled"


def test_errors_are_explained(page: Any, stack: Stack, screenshots: Path) -> None:
    # A file that is not an image at all is refused before upload.
    page.set_input_files(
        "#file-input",
        files=[{"name": "notes.txt", "mimeType": "text/plain", "buffer": b"shopping list"}],
    )
    alert = page.locator("#create-error")
    alert.wait_for()
    assert "isn’t a photo" in alert.inner_text()

    # One that claims to be a PNG: the server says why, the page says what to do.
    page.set_input_files(
        "#file-input",
        files=[{"name": "holiday.png", "mimeType": "image/png", "buffer": b"\x00" * 2048}],
    )
    page.click("#generate-button")
    page.wait_for_function(
        "() => /unsupported_image_type|corrupt_image/.test("
        "document.querySelector('#create-error').innerText)"
    )
    text = alert.inner_text()
    assert "JPEG, PNG, WebP" in text or "couldn’t be opened" in text
    assert "Traceback" not in text

    # A photo with no object fails on the worker; the task page explains it.
    blank = io.BytesIO()
    Image.new("RGB", (256, 256), "white").save(blank, format="PNG")
    page.click("#photo-list .photo-remove")
    page.set_input_files(
        "#file-input",
        files=[{"name": "wall.png", "mimeType": "image/png", "buffer": blank.getvalue()}],
    )
    page.click("#generate-button")
    page.wait_for_selector("#task-error:not([hidden])", timeout=RESULT_TIMEOUT)
    assert "couldn’t find an object" in page.inner_text("#task-error-title")
    assert "plain background" in page.inner_text("#task-error-advice")
    assert "no_object_found" in page.inner_text("#task-error-detail")
    page.screenshot(path=str(screenshots / "error.png"))


def test_gallery_lists_opens_pages_and_deletes(page: Any, stack: Stack, screenshots: Path) -> None:
    with stack.client() as client:
        done = client.post(
            "/api/v1/generate",
            files={"image": ("cup.png", object_photo(320, seed=9), "image/png")},
        ).json()
        stack.wait_for_task(client, done["id"])

    page.goto("/#/models")
    first = page.locator(f'.card[data-task-id="{done["id"]}"]')
    assert first.locator(".badge").inner_text() == "Ready"
    thumb = first.locator(".card-thumb img")
    thumb.wait_for()
    page.wait_for_function(
        "img => img.complete && img.naturalWidth > 0", arg=thumb.element_handle()
    )
    page.screenshot(path=str(screenshots / "gallery.png"))

    # Enough tasks for a second page, canceled at once so they cost no CPU.
    with stack.client() as client:
        extra = []
        for i in range(13):
            task = client.post(
                "/api/v1/generate",
                files={"image": (f"x{i}.png", object_photo(64, seed=i), "image/png")},
                data={"options": '{"backend": "fake-slow"}'},
            ).json()
            client.post(f"/api/v1/task/{task['id']}/cancel")
            extra.append(task["id"])
    page.click("#models-refresh")
    page.wait_for_selector(f'.card[data-task-id="{extra[-1]}"]')
    assert page.locator(".card").count() == 12  # one page, newest first
    assert first.count() == 0
    page.click("#load-more")
    first.wait_for()

    # Delete one (the page asks first), then open the finished one.
    victim = page.locator(f'.card[data-task-id="{extra[-1]}"]')
    page.once("dialog", lambda dialog: dialog.accept())
    victim.locator(".card-delete").click()
    victim.wait_for(state="detached")
    with stack.client() as client:
        assert client.get(f"/api/v1/task/{extra[-1]}").status_code == 404

    first.locator(".card-title").click()
    wait_for_model(page)
    assert current_task_id(page) == done["id"]


def test_api_key_panel_and_billing(page: Any, stack: Stack) -> None:
    """A 401 opens the account panel; the saved key goes out as a Bearer header on every
    request, the event stream included. Credits show only where the server bills."""
    with stack.client() as client:
        response = client.post("/api/v1/keys", json={"name": "browser test"})
        assert response.status_code == 201, response.text
        key = response.json()["key"]
    # This stack runs without AUTH_REQUIRED: answer 401 to any API request without a key, as
    # a server that requires keys does; requests with a key go on to the real server.
    sent: list[str | None] = []

    def require_key(route: Any) -> None:
        auth = route.request.headers.get("authorization")
        sent.append(auth)
        if auth is None:
            route.fulfill(
                status=401,
                content_type="application/json",
                body='{"error": {"code": "missing_api_key", "message": "send an API key"}}',
            )
        else:
            route.continue_()

    page.route("**/api/v1/**", require_key)
    page.goto("/#/models")
    page.wait_for_selector("#account-dialog[open]")
    assert "needs an API key" in page.inner_text("#account-message")

    # A wrong key: the real server refuses it and the panel says so.
    page.fill("#api-key", "p3d_wrong")
    page.click('#account-form button[value="save"]')
    page.wait_for_function(
        "() => document.querySelector('#account-dialog').open && "
        "document.querySelector('#account-message').innerText.includes('accept')"
    )

    page.fill("#api-key", key)
    page.click('#account-form button[value="save"]')
    page.wait_for_selector("#account-dialog", state="hidden")
    page.wait_for_function(
        "() => /shown/.test(document.querySelector('#models-status').textContent)"
    )
    assert page.evaluate("() => localStorage.getItem('photo3d.apiKey')") == key
    assert sent[-1] == f"Bearer {key}"

    # The progress stream is read with fetch(), so it carries the key too.
    with stack.client() as client:
        task = client.post(
            "/api/v1/generate",
            files={"image": ("toy.png", object_photo(128), "image/png")},
            data={"options": '{"backend": "fake-slow"}'},
        ).json()
        with page.expect_request(re.compile(r"/stream$")) as stream:
            page.goto(f"/#/task/{task['id']}")
        assert stream.value.headers.get("authorization") == f"Bearer {key}"
        page.wait_for_selector("#progress-panel:not([hidden])")
        client.post(f"/api/v1/task/{task['id']}/cancel")
    page.wait_for_selector("#task-error:not([hidden])")

    # This server does not bill: no credits anywhere. One that does shows the balance.
    assert page.is_hidden("#credits")
    page.route(
        "**/api/v1/account",
        lambda route: route.fulfill(
            status=200,
            content_type="application/json",
            body='{"id": "local", "name": "local", "is_admin": false, "auth_required": true,'
            ' "billing": {"enabled": true, "balance": 42, "buy_url": "/buy"}}',
        ),
    )
    page.reload()
    page.wait_for_selector("#credits:not([hidden])")
    assert page.inner_text("#credits") == "42 credits"


def test_viewer_downloads_and_ar_link_use_signed_links_when_keys_are_required(
    page: Any, stack: Stack, tmp_path: Path
) -> None:
    """With keys required, the viewer, the poster, a download and the AR Quick Look USDZ link
    still load: they are signed links, fetched without the key header (issue #14)."""
    with stack.client() as client:
        key = client.post("/api/v1/keys", json={"name": "signed links"}).json()["key"]
        task = client.post(
            "/api/v1/generate",
            files={"image": ("toy.png", object_photo(256, seed=3), "image/png")},
            headers={"Authorization": f"Bearer {key}"},
        ).json()
        stack.wait_for_task(client, task["id"])
    # As on a server with AUTH_REQUIRED=true: an API request without the key answers 401,
    # except a signed download link, whose signature is its authorization.
    downloads: list[str | None] = []

    def require_key(route: Any) -> None:
        auth = route.request.headers.get("authorization")
        if "/api/v1/download/" in route.request.url:
            downloads.append(auth)
            route.continue_()
        elif auth is None:
            route.fulfill(
                status=401,
                content_type="application/json",
                body='{"error": {"code": "missing_api_key", "message": "send an API key"}}',
            )
        else:
            route.continue_()

    page.route("**/api/v1/**", require_key)
    page.evaluate("key => localStorage.setItem('photo3d.apiKey', key)", key)
    page.goto(f"/#/task/{task['id']}")
    wait_for_model(page)
    ios_src = page.evaluate("() => document.querySelector('model-viewer').iosSrc")
    assert "/api/v1/download/" in ios_src and "/usdz?" in ios_src
    with page.expect_download() as download_info:
        page.click('#downloads [data-format="glb"]')
    glb_path = tmp_path / "signed.glb"
    download_info.value.save_as(glb_path)
    assert glb_path.read_bytes()[:4] == b"glTF"
    assert downloads and all(auth is None for auth in downloads)
    # Quick Look fetches the USDZ itself, with no header at all.
    with stack.client() as client:
        usdz = client.get(ios_src)
    assert usdz.status_code == 200 and usdz.content[:2] == b"PK"


def test_bulk_batches_are_listed_with_their_progress(
    page: Any, stack: Stack, tmp_path: Path, screenshots: Path
) -> None:
    """A bulk job run beside the stack (as a plain script): "My models" shows its batch."""
    import os
    import subprocess
    import sys

    photos = tmp_path / "shelf"
    photos.mkdir()
    for i in range(2):
        (photos / f"vase{i}.png").write_bytes(object_photo(96, seed=60 + i))
    (photos / "torn.jpg").write_bytes(b"not a photo")
    env = {
        **os.environ,
        "DATABASE_URL": stack.database_url,
        "PHOTO3D_RUN_DIR": str(stack.run_dir),
        "PYTHONPATH": str(ROOT),
    }
    command = [sys.executable, "-m", "jobs.bulk_convert", "--input", str(photos)]
    command += ["--output", str(tmp_path / "out"), "--batch-id", "shelf-photos"]
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr

    page.goto("/#/models")
    batch = page.locator('.batch[data-batch-id="shelf-photos"]')
    batch.wait_for()
    assert batch.locator(".badge").inner_text() == "Done"
    assert batch.locator("progress").evaluate("bar => bar.value") == 1
    meta = batch.locator(".batch-meta").inner_text()
    assert "2 done" in meta and "1 failed" in meta and "of 3" in meta
    page.screenshot(path=str(screenshots / "batches.png"))

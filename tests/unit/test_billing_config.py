"""The billing config: prices in credits, packs and plans, validated at startup."""

from __future__ import annotations

from pathlib import Path

import pytest

from serve_app.billing import load_config, lookup_key
from serve_app.errors import InvalidInput
from serve_app.settings import Settings


def test_packaged_config_prices_backends_and_surcharges() -> None:
    config = load_config(None)
    assert config.price({"backend": "cpu"}) == 1
    assert config.price({"backend": "trellis2", "resolution": 1536}) == 8 + 4
    assert config.price({"backend": "cpu", "texture_size": 4096}) == 1 + 2
    assert config.price({"backend": "some-plugin"}) == config.prices.default
    assert config.pack("starter") is not None and config.pack("nope") is None
    assert config.plan("metered") is not None and config.plan("metered").metered  # type: ignore[union-attr]
    assert lookup_key("pack", "starter") == "photo3d_pack_starter"


def test_a_bad_config_is_refused_with_its_path(tmp_path: Path) -> None:
    bad = tmp_path / "billing.yaml"
    bad.write_text("packs: [{name: x, credits: -5, amount: 100}]\n")
    with pytest.raises(InvalidInput) as caught:
        load_config(bad)
    assert str(bad) in caught.value.message and caught.value.code == "config_error"


def test_billing_is_off_by_default_and_secrets_never_print(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("STRIPE_SECRET_KEY", "PHOTO3D_BILLING", "STRIPE_WEBHOOK_SECRET"):
        monkeypatch.delenv(name, raising=False)
    assert Settings().billing_enabled is False
    monkeypatch.setenv("STRIPE_SECRET_KEY", "sk_test_supersecret")
    monkeypatch.setenv("STRIPE_WEBHOOK_SECRET", "whsec_supersecret")
    settings = Settings()
    assert settings.billing_enabled is True
    assert "supersecret" not in repr(settings) and "supersecret" not in str(settings)
    monkeypatch.setenv("PHOTO3D_BILLING", "false")
    assert Settings().billing_enabled is False

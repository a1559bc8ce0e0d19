-- Issue 11: the files of a succeeded task that are stored after its success (the preview, the
-- formats asked for besides GLB), marked ready one by one as each is stored.

-- name: result_file_ready
-- %(path)s names the entry: {preview} or {files,<format>}. Fenced like the result (this attempt,
-- still succeeded, the entry still there): a deleted or expired task is left alone.
UPDATE tasks
SET result = jsonb_set(result, %(path)s::text[],
                       (result #> %(path)s::text[])
                       || jsonb_build_object('ready', true, 'bytes', %(bytes)s::bigint)),
    updated_at = clock_timestamp()
WHERE id = %(id)s AND attempt = %(attempt)s AND status = 'succeeded'
  AND jsonb_typeof(result #> %(path)s::text[]) = 'object'
RETURNING id;

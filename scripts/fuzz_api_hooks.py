"""schemathesis hooks for scripts/fuzz_api.py (loaded through ``SCHEMATHESIS_HOOKS``): a code
archive's body (``application/gzip``) is sent as the bytes schemathesis generates for it."""

import schemathesis

schemathesis.serializer.alias("application/gzip", "application/octet-stream")

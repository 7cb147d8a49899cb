"""The feedback store: every review decision in one SQLite file (see :mod:`.store`)."""
from .codec import PATCH_CODEC, decode_patch, encode_patch, lesion_key
from .schema import APPLICATION_ID, MIGRATIONS, SCHEMA_VERSION, FeedbackStoreError, default_path, inspect_file
from .store import COLUMNS, FeedbackStore, LabelledSet

__all__ = [
    "PATCH_CODEC", "decode_patch", "encode_patch", "lesion_key",
    "APPLICATION_ID", "MIGRATIONS", "SCHEMA_VERSION", "FeedbackStoreError", "default_path", "inspect_file",
    "COLUMNS", "FeedbackStore", "LabelledSet",
]

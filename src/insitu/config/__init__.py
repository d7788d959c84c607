"""Configuration: one schema per component, declared on its dataclass fields.

``setting(...)`` declares a field's help, section, choices and flag aliases; flags
(``insitu.config.cli``), settings-file keys, type and choice checks and the saved JSON are derived
from it.
"""

from insitu.config.schema import (
    Field,
    Setting,
    canonical_keys,
    coerce,
    from_mapping,
    key_map,
    schema,
    settable,
    setting,
    to_dict,
)

__all__ = ["Field", "Setting", "canonical_keys", "coerce", "from_mapping", "key_map", "schema", "settable",
           "setting", "to_dict"]

"""streaming-form-data, imported without smart_open.

Its `targets` module imports smart_open at the top (≈15 MiB resident and ≈170 ms here) for
SmartPipeTarget, which mediad never uses. A placeholder stands in for the duration of the import
only, so anything else in the process that imports smart_open still gets the real one.
"""

from __future__ import annotations

import sys
import types

_placeholder = None
if "smart_open" not in sys.modules:
    _placeholder = sys.modules["smart_open"] = types.ModuleType("smart_open")
try:
    from streaming_form_data import StreamingFormDataParser
    from streaming_form_data.parser import ParseFailedException, parse_content_boundary
    from streaming_form_data.targets import BaseTarget, ValueTarget
    from streaming_form_data.validators import MaxSizeValidator, ValidationError
finally:
    if _placeholder is not None and sys.modules.get("smart_open") is _placeholder:
        del sys.modules["smart_open"]

__all__ = ["BaseTarget", "MaxSizeValidator", "ParseFailedException", "StreamingFormDataParser", "ValidationError",
           "ValueTarget", "parse_content_boundary"]

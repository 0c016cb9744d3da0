"""The bridge's ``client.py`` and ``messages.py`` as they were at protocol 1 before features
(commit cfa8469), unchanged: an older plug-in that must keep working against newer servers.

Do not edit ``client.py`` or ``messages.py`` here. The modules they import that are not wire
format (errors, frames, geometry, settings, the vendored websockets) come from today's bridge.
"""

import sys

import genfill_bridge
import genfill_bridge._vendor.websockets.exceptions
import genfill_bridge._vendor.websockets.sync.client
from genfill_bridge import errors, frames, geometry, settings

__version__ = "0.1.0-frozen"

for _name, _module in {
    "errors": errors,
    "frames": frames,
    "geometry": geometry,
    "settings": settings,
    "_vendor": genfill_bridge._vendor,
    "_vendor.websockets": genfill_bridge._vendor.websockets,
    "_vendor.websockets.exceptions": genfill_bridge._vendor.websockets.exceptions,
    "_vendor.websockets.sync": genfill_bridge._vendor.websockets.sync,
    "_vendor.websockets.sync.client": genfill_bridge._vendor.websockets.sync.client,
}.items():
    sys.modules[f"{__name__}.{_name}"] = _module

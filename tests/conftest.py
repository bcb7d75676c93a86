"""Test-wide set-up.

torchvision (installed only for the image-preprocessing oracle) ships compiled detection ops that do
not load against the CPU torch wheel; its `_meta_registrations` module then fails at import, and with it
every transformers import. Resize and normalise never use those ops, so an empty stand-in is enough.
"""

import sys
import types

sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))

"""AppPot: run a user-built Debian appliance under User-Mode Linux, no root.

This package is the single-instance core: ``apppot-image`` builds appliances,
``apppot-start`` boots one and runs a program in it, and the guest side
(``init.py``, ``snap.py``) runs inside the appliance.
"""

__version__ = "0.1.0"

"""kbus.testing: what tests of device code need.

* The pytest plugin (:mod:`kbus.testing.plugin`) is registered through the
  ``pytest11`` entry point when kbus is installed: the ``kbus_device`` and
  ``kbus_sim`` fixtures, the ``kbus`` marker, ``--kbus-config`` and the
  ``kbus_config`` ini key. It is not imported here, so ``import kbus.testing``
  does not need pytest.
* Deadlines in device time, re-exported from :mod:`kbus.sim.timeouts` (also
  available as ``kbus.fail_after`` / ``kbus.move_on_after``): "this transfer
  must finish within 5 us of device time", checked in microseconds of wall time.

See README.md in this package.
"""

from ..sim.timeouts import TimeoutScope, fail_after, move_on_after

__all__ = ["TimeoutScope", "fail_after", "move_on_after"]

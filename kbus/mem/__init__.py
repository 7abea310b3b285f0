"""kbus.mem."""

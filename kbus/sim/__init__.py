"""kbus.sim."""

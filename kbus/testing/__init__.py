"""kbus.testing."""

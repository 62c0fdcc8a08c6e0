"""The write side (publisher), the reference training API and the demo model."""

"""The shared decision code: pure Python, no clock, no simpy, no torch (DESIGN.md section 1)."""

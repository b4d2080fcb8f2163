"""Studies: what runs the drivers (the simulator, and later the live system) to answer a
question, above both drivers in the layering. `against`: the simulator against a real serving
run. Sweeps, capacity, plan, reproduce and live validation will move here from `sim/` and
`live/`."""

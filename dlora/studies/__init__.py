"""Studies: what runs the drivers (the simulator, the live system) to answer a question, above
both drivers in the layering: a scenario or its sweep (`run`), throughput under the SLO
(`capacity`), the fewest replicas for a rate (`plan`), the paper's figures (`reproduce`,
`report_md`), live against simulated (`validate`), the simulator against a real serving run
(`against`)."""

"""Classical solvers (sigpy baselines, TV, CG), coil maps, and the numerics the samplers share."""

"""The sampler's math: diffusions, timers, integrators, (conditional) denoisers, guidance, adaptation."""

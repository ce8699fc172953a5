"""Energy measurement harness (meters, runs, reports). Filled in by the energy issue."""

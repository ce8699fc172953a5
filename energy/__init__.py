"""Energy measurement: meters, a harness with idle baseline and confidence intervals, reports.

    from energy import Harness, detect_meter
    edge, why = detect_meter("edge")           # battery > RAPL > modelled, with the reasons
    m = Harness(edge).measure(my_callable)     # >= 5 repetitions, idle subtracted
    print(m.edge_j, m.edge_method)             # every figure says how it was obtained

This package does not import the SDK: it measures callables and commands. ``pipesd energy`` (in
``pipesd_lab``) uses it to compare the decoding methods per scenario; ``python -m energy`` measures any
command and lists the meters this machine has. See docs/energy.md.
"""

from .harness import PHASES, Activity, Baseline, Harness, Measurement, Sample, Stat, mean_ci
from .meters import (CPU_MODELS, METERS, Apportioned, BatteryMeter, CpuClock, CpuPowerModel, Meter, MeterError,
                     MeterUnavailable, ModelledMeter, NvmlMeter, RaplMeter, Reading, detect_meter)
from .radio import RADIOS, RadioEnergy, RadioModel, Transfer, radio_energy

__all__ = ["PHASES", "Activity", "Baseline", "Harness", "Measurement", "Sample", "Stat", "mean_ci", "CPU_MODELS",
           "METERS", "Apportioned", "BatteryMeter", "CpuClock", "CpuPowerModel", "Meter", "MeterError",
           "MeterUnavailable", "ModelledMeter", "NvmlMeter", "RaplMeter", "Reading", "detect_meter", "RADIOS",
           "RadioEnergy", "RadioModel", "Transfer", "radio_energy"]

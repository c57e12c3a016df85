"""The run's privacy settings other than the budget: where its mechanisms' randomness comes from.

A light module of its own: the configuration, the run context (whose `mechanism_generator` reads
it) and the ledger (which records it) all import it, and none of them imports the others for it.
"""

from __future__ import annotations

from dataclasses import dataclass

from privbench.errors import PrivbenchError

RANDOMNESS = ("seeded", "os")


@dataclass(frozen=True)
class PrivacyConfig:
    # Where the mechanisms' noise and Poisson sampling come from (RunContext.mechanism_generator): seeded
    # from the run seed, so a benchmark run repeats bit for bit, or drawn from the OS's entropy, so that
    # no one who knows the seed (it is published with the configuration) can subtract the noise.
    randomness: str = "seeded"

    def __post_init__(self):
        if self.randomness not in RANDOMNESS:
            raise PrivbenchError(f"setting 'privacy.randomness' must be one of {', '.join(RANDOMNESS)}, got "
                                 f"{self.randomness!r}: e.g. --set privacy.randomness=os")

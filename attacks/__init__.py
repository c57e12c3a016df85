"""Membership-inference attacks and the privacy audit, one module per attack (imports as
`privbench.attacks`). `--attack NAME` resolves through ATTACKS; the attacks themselves arrive with
the auditing work (score members against the run's saved non-members, see DESIGN's step 6)."""

from privbench.registry import Registry

ATTACKS: Registry[type] = Registry("attack")

__all__ = ["ATTACKS"]

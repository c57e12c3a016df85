"""Canaries planted in a DP-SGD phase, for the one-run audit of its accounting (attacks/one_run.py).

An audited run (`audit.canaries`, `audit.canary_examples`) plants canaries in its DP-SGD phase, each
included independently with probability 1/2 (Steinke, Nasr and Jagielski 2023), and scores them under
two threat models.

White-box, every noisy update seen (Nasr et al. 2023, "Tight auditing of differentially private machine
learning"):
- gradient canaries: Dirac directions at the clipping bound C, one distinct parameter coordinate each.
  An included canary joins each logical batch at the phase's real sample rate q and adds C to its
  coordinate of the clipped sum, before the noise. Injected after clipping, they test the noise and the
  accounting, never the clipping.
- canary examples: crafted outliers (every pixel -1 or +1, a random label) added to the members when
  included, so that their gradients go through the real per-example clipping with unclipped norms far
  above C. Before each step the auditor takes each canary example's gradient at the current parameters
  (with its own draws of the loss's randomness) and reads the noisy sum along it.
Each canary's per-step readings, in units of C, are scored by their log-likelihood ratio under the
subsampled Gaussian mechanism the ledger recorded (`subsampled_gaussian_llr`).

Final model only: the canary examples' loss decrease from the phase's initial to its final model.

The one-run bound is far from tight for subsampled Gaussians (see attacks/one_run.py and the audit
board), so it cannot see every accounting mistake: an accountant told half the real sample rate
understates epsilon about twofold, and ideal canaries in the true mechanism bound it at only about a
third of its true epsilon. The white-box readings also measure the mechanism directly
(`measure_mechanism`): the included gradient canaries' excess over the excluded ones is the real
sample rate; the excluded ones' spread bounds the noise from above; the canary examples' excess is
one member's influence per step. Each is checked against what the ledger recorded.

The canaries change what is trained: an audited run is never scored or ranked as a synthesizer.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
from scipy.stats import binom, chi2, norm
import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from torch import nn

from privbench.attacks.one_run import choose_guesses, one_run_audit, subsampled_gaussian_llr
from privbench.dp.ledger import Mechanism
from privbench.errors import PrivbenchError
from privbench.metrics.names import CANARY_FAILURES, EPS_LB_CANARY, canary_eps_lb

THREAT_MODELS = ("gradient", "example", "final-model")
# Draws of the loss's randomness (diffusion noise levels and noise) averaged per canary example when the
# final-model audit compares the initial and final losses.
FINAL_LOSS_DRAWS = 16


@dataclass
class CanaryScores:
    """One threat model's canaries: their scores (higher: more likely in) and whether each was in."""

    scores: np.ndarray
    included: np.ndarray


def _less_persistent_part(readings: np.ndarray, noise_multiplier: float) -> np.ndarray:
    """Readings less the shrunk part of each canary's mean over the steps.

    The members' gradients add to a canary's reading at every step, much alike from step to step (a
    bias of its own per canary); the canary adds to it only at the few steps it is sampled. Removing
    each canary's mean removes its bias but adds the mean's noise (sigma^2 / T) to every reading, which
    costs more than it gains where the biases are small (the smoke UNet's: their spread across canaries
    was 1.2 times sigma^2 / T; DP-GAN's discriminator's: 5 times). So the mean is shrunk by the share
    of its spread across canaries that is not noise (empirical Bayes): weight 1 - (sigma^2 / T) / spread,
    floored at 0. It uses every canary's readings alike, never whether a canary was in, so any score
    computed from them keeps the one-run bound valid."""
    means = readings.mean(axis=0)
    spread = means.var()
    weight = max(0.0, 1.0 - noise_multiplier**2 / len(readings) / spread) if spread > 0 else 0.0
    return readings - weight * means


def _outliers(members: list[torch.Tensor], count: int, classes: int, generator: torch.Generator) -> list[torch.Tensor]:
    """`count` crafted rows shaped like the members' (images, labels): images with every value -1 or +1
    (as far from natural images in [-1, 1] as a valid image goes), labels drawn uniformly from the
    public class list (never from the members' labels)."""
    rows = []
    for t in members:
        if t.is_floating_point():
            rows.append(torch.randint(0, 2, (count, *t.shape[1:]), generator=generator).to(t.dtype) * 2 - 1)
        else:
            rows.append(torch.randint(0, classes, (count, *t.shape[1:]), generator=generator).to(t.dtype))
    return rows


class CanaryAudit:
    """The canaries of one DP-SGD phase and what the auditor saw of them.

    The phase calls, in order: `plant(members)` (the members with the included canary examples),
    `start(model, ...)` before wrapping it, `instrument(optimizer_class)`, `before_step(loss_fn)` at
    every logical step, and `finish()` when it ends. `scores()` then gives each threat model's
    canaries. `classes`: the number of classes, from the task's public class list."""

    def __init__(self, gradient: int, examples: int, classes: int, generator: torch.Generator):
        if gradient < 0 or examples < 0 or gradient + examples == 0:
            raise PrivbenchError(f"an audit needs canaries: got {gradient} gradient canaries and {examples} examples")
        self.gradient, self.examples, self.classes, self._generator = gradient, examples, classes, generator
        self.gradient_in = torch.rand(gradient, generator=generator) < 0.5
        self.example_in = torch.rand(examples, generator=generator) < 0.5
        self.mechanism: Mechanism | None = None
        self._planted = False
        self._gradient_seen: list[torch.Tensor] = []
        self._example_seen: list[torch.Tensor] = []
        self._final_scores: np.ndarray | None = None
        self._norm_ratios: list[float] = []  # per step: the canary examples' median unclipped norm over C
        self._sum_norms: list[float] = []  # per step: the noisy sum's norm over C

    def plant(self, members: list[torch.Tensor]) -> list[torch.Tensor]:
        """The members with the included canary examples appended (each phase's data; once per run)."""
        if self._planted:
            raise PrivbenchError("an audited run plants its canaries in one DP-SGD phase; this method has several")
        self._planted = True
        self.example_rows = _outliers(list(members), self.examples, self.classes, self._generator)
        included = self.example_in.nonzero().flatten()
        self.rows_total = len(members[0]) + len(included)  # public: the size of the data trained on
        return [torch.cat([t, c[included].to(t.device)]) for t, c in zip(members, self.example_rows)]

    def start(self, model: nn.Module, sample_rate: float, clip_norm: float, mechanism: Mechanism) -> None:
        """Keep a probe copy of the unwrapped model (the auditor's: its gradients never reach training)
        and its initial parameters."""
        self.sample_rate, self.clip_norm, self.mechanism = sample_rate, clip_norm, mechanism
        self._names = [name for name, p in model.named_parameters() if p.requires_grad]
        self._probe = copy.deepcopy(model)
        self._initial = {name: p.detach().clone() for name, p in self._probe.named_parameters()}
        self._probe_wrapped = GradSampleModule(self._probe, batch_first=True, loss_reduction="sum", force_functorch=True)
        self._model = model
        self._directions: torch.Tensor | None = None
        self._loss_fn = None

    def instrument(self, base: type[DPOptimizer]) -> type[DPOptimizer]:
        """`base` with the canaries' gradients added to the clipped sum before the noise, and the noisy
        sum read along every canary after it."""
        audit = self

        class CanaryOptimizer(base):
            def add_noise(self):
                audit._inject(self.params)
                super().add_noise()
                audit._observe(self.params)

        return CanaryOptimizer

    def _coordinates(self, params: list[nn.Parameter]) -> torch.Tensor:
        if not hasattr(self, "_coords"):
            size = sum(p.numel() for p in params)
            if self.gradient > size:
                raise PrivbenchError(f"{self.gradient} gradient canaries need as many coordinates; the model has {size}: "
                                     f"use --set audit.canaries={size}")
            self._coords = torch.randperm(size, generator=self._generator)[: self.gradient].sort().values
        return self._coords

    def _inject(self, params: list[nn.Parameter]) -> None:
        if not self.gradient:
            return
        coords = self._coordinates(params)
        present = self.gradient_in & (torch.rand(self.gradient, generator=self._generator) < self.sample_rate)
        flat = torch.zeros(sum(p.numel() for p in params), device=params[0].device)
        flat[coords.to(flat.device)] = present.to(flat.device, flat.dtype) * self.clip_norm
        for p, part in zip(params, flat.split([p.numel() for p in params])):
            p.summed_grad = p.summed_grad + part.view_as(p.summed_grad).to(p.summed_grad.dtype)

    def _observe(self, params: list[nn.Parameter]) -> None:
        flat = torch.cat([p.grad.detach().reshape(-1).float() for p in params])
        self._sum_norms.append(float(flat.norm()) / self.clip_norm)
        self.dimension = flat.numel()
        if self.gradient:
            self._gradient_seen.append(flat[self._coordinates(params).to(flat.device)].cpu() / self.clip_norm)
        if self.examples:
            self._example_seen.append((self._directions @ flat).cpu() / self.clip_norm)

    def _gradients(self, loss_fn, rows: list[torch.Tensor]) -> torch.Tensor:
        """Per-example gradients [rows, d] of the probe, flattened in the trainable parameters' order."""
        from privbench.dp.sgd import per_example_backward

        self._probe_wrapped.zero_grad(set_to_none=True)
        per_example_backward(self._probe_wrapped, None, loss_fn, rows, 1, "functorch", check=False)
        named = dict(self._probe.named_parameters())
        flat = torch.cat([named[n].grad_sample.reshape(len(rows[0]), -1) for n in self._names], dim=1)
        self._probe_wrapped.zero_grad(set_to_none=True)
        return flat

    def before_step(self, loss_fn) -> None:
        """The canary examples' unit gradient directions at the parameters this step starts from."""
        self._loss_fn = loss_fn
        if not self.examples:
            return
        with torch.no_grad():
            probe = dict(self._probe.named_parameters())
            for name, p in self._model.named_parameters():
                probe[name].copy_(p)
        device = next(self._model.parameters()).device
        gradients = self._gradients(loss_fn, [t.to(device) for t in self.example_rows])
        self._norm_ratios.append(float(gradients.norm(dim=1).median()) / self.clip_norm)
        self._directions = gradients / gradients.norm(dim=1, keepdim=True).clamp_min(1e-12)

    @torch.no_grad()
    def _mean_losses(self, loss_fn, parameters: dict[str, torch.Tensor]) -> torch.Tensor:
        probe = dict(self._probe.named_parameters())
        for name, value in parameters.items():
            probe[name].copy_(value)
        device = next(self._model.parameters()).device
        rows = [t.to(device).repeat_interleave(FINAL_LOSS_DRAWS, dim=0) for t in self.example_rows]
        self._probe_wrapped.disable_hooks()
        try:
            losses = loss_fn(self._probe, *rows).float()
        finally:
            self._probe_wrapped.enable_hooks()
        return losses.view(self.examples, FINAL_LOSS_DRAWS).mean(dim=1).cpu()

    def finish(self) -> None:
        """The final-model scores: each canary example's loss decrease from the initial model to the final."""
        if self.examples and self._loss_fn is not None:
            final = {name: p.detach().clone() for name, p in self._model.named_parameters()}
            before = self._mean_losses(self._loss_fn, self._initial)
            after = self._mean_losses(self._loss_fn, final)
            self._final_scores = (before - after).double().numpy()
        self._probe_wrapped.to_standard_module()
        del self._probe, self._probe_wrapped, self._directions

    @property
    def unclipped_norm_ratio(self) -> float | None:
        """The canary examples' median unclipped gradient norm over the clipping bound, over the steps."""
        return float(np.median(self._norm_ratios)) if self._norm_ratios else None

    def raw(self) -> dict[str, np.ndarray]:
        """Everything the auditor observed, uncentered, with the inclusion bits: for the run directory, so
        that the scores can be studied again without training again."""
        out = {"gradient_in": self.gradient_in.numpy(), "example_in": self.example_in.numpy(),
               "sum_norms": np.array(self._sum_norms)}
        if self.gradient:
            out["gradient_readings"] = torch.stack(self._gradient_seen).numpy()
        if self.examples:
            out["example_readings"] = torch.stack(self._example_seen).numpy()
            out["final_model_scores"] = self._final_scores
        return out

    def readings(self, kind: str) -> np.ndarray:
        """The white-box readings [steps, canaries] in units of C: of the gradient canaries' coordinates,
        or of the noisy sum along each canary example's gradient, less the step's median over the canary
        examples (what they all read alike: the members' gradients, the other canaries' along shared
        directions). Means over the steps are unbiased, whatever else lands in a canary's reading."""
        if kind == "gradient":
            return torch.stack(self._gradient_seen).double().numpy()
        seen = torch.stack(self._example_seen).double().numpy()
        return seen - np.median(seen, axis=1, keepdims=True)

    def scores(self) -> dict[str, CanaryScores]:
        """Each threat model's canary scores, for the threat models this audit planted canaries for."""
        if self.mechanism is None:
            raise PrivbenchError("the audited run never opened a DP-SGD phase: nothing was planted")
        q, sigma = self.mechanism.sample_rate, self.mechanism.noise_multiplier
        out = {}
        if self.gradient:
            seen = _less_persistent_part(self.readings("gradient"), sigma)
            out["gradient"] = CanaryScores(subsampled_gaussian_llr(seen, q, sigma), self.gradient_in.numpy())
        if self.examples:
            seen = _less_persistent_part(self.readings("example"), sigma)
            out["example"] = CanaryScores(subsampled_gaussian_llr(seen, q, sigma), self.example_in.numpy())
            out["final-model"] = CanaryScores(self._final_scores, self.example_in.numpy())
        return out


def audit_canaries(audit: CanaryAudit, delta: float, significance: float) -> dict[str, dict]:
    """The one-run bound of each threat model at `significance` / (number of threat models), so that
    the largest of them holds at `significance` (Bonferroni). The guesses each makes are fixed from
    the recorded mechanism alone (attacks.one_run.choose_guesses), which also gives `ideal`: the median
    bound of as many ideal Dirac canaries alone in that mechanism, the most this audit could expect."""
    scores = audit.scores()
    level = significance / len(scores)
    m = audit.mechanism
    results = {}
    for kind, canaries in scores.items():
        k_in, k_out, ideal = choose_guesses(len(canaries.scores), m.sample_rate, m.noise_multiplier, m.steps, delta, level)
        results[kind] = one_run_audit(canaries.scores, canaries.included, delta, k_in, k_out, level).to_dict()
        results[kind]["ideal"] = ideal
    return results


MECHANISM_SIGNIFICANCE = 1e-3  # per check: an honest run fails one of the four with probability <= 0.4%


def _excess(readings: np.ndarray, included: np.ndarray, z: float) -> tuple[float, float, float]:
    """The included canaries' mean reading per step less the excluded ones', with a normal interval of
    z standard errors (Welch: each group's spread of per-canary means, so whatever else lands in a
    canary's coordinate, the same for either group in expectation, widens it honestly)."""
    means = readings.mean(axis=0)
    inside, outside = means[included], means[~included]
    excess = inside.mean() - outside.mean()
    se = np.sqrt(inside.var(ddof=1) / len(inside) + outside.var(ddof=1) / len(outside))
    return float(excess), float(excess - z * se), float(excess + z * se)


def measure_mechanism(audit: CanaryAudit, significance: float = MECHANISM_SIGNIFICANCE) -> dict:
    """What the white-box readings say of the mechanism, against what the ledger recorded for it.

    - sample rate (gradient canaries): an included canary adds 1 (one C) at the steps it is sampled, so
      the included canaries' excess reading per step is the real rate q. Fails if its lower bound
      exceeds the recorded q.
    - noise (gradient canaries): an excluded canary's reading is noise plus the members' gradients in
      its coordinate, so its spread about its own mean bounds sigma from above (chi-square). Fails if
      that upper bound is below the recorded sigma.
    - influence (canary examples): the included examples' excess reading along their own gradients is
      q times one member's influence per step, at most 1 (one C) when clipping holds. Fails if its
      lower bound, divided by the recorded q, exceeds 1.
    - clipped sum (every step): the noisy sum is the clipped sum of the step's batch, of norm at most
      |batch| C, plus noise, of norm at most sigma C (sqrt(d) + sqrt(2 ln(2T / alpha))) at every step with
      probability 1 - alpha/2 (Gaussian concentration of a 1-Lipschitz function); |batch| is at most the
      Binomial(rows, q) quantile at 1 - alpha / (2T) at every step with probability 1 - alpha/2, where
      rows counts the members, the included canary examples and the included gradient canaries. Fails
      if a step's norm exceeds the sum of the two: clipping failed by more than the noise can hide.
    """
    m = audit.mechanism
    z = float(norm.ppf(1 - significance))
    checks = {}
    if audit.gradient:
        seen, inside = audit.readings("gradient"), audit.gradient_in.numpy()
        rate, low, high = _excess(seen, inside, z)
        checks["sample_rate"] = {"measured": rate, "interval": [low, high], "recorded": m.sample_rate,
                                 "fails": low > m.sample_rate}
        outside = seen[:, ~inside]
        dof = outside.shape[1] * (outside.shape[0] - 1)
        spread = ((outside - outside.mean(axis=0)) ** 2).sum() / dof
        upper = float(np.sqrt(dof * spread / chi2.ppf(significance, dof)))
        checks["noise"] = {"measured": float(np.sqrt(spread)), "upper": upper, "recorded": m.noise_multiplier,
                           "fails": upper < m.noise_multiplier}
    if audit.examples:
        excess, low, high = _excess(audit.readings("example"), audit.example_in.numpy(), z)
        checks["influence"] = {"measured": excess / m.sample_rate, "interval": [low / m.sample_rate, high / m.sample_rate],
                               "bound": 1.0, "unclipped_norm_ratio": audit.unclipped_norm_ratio,
                               "fails": low / m.sample_rate > 1.0}
    steps = len(audit._sum_norms)
    rows = audit.rows_total + int(audit.gradient_in.sum())
    batch = float(binom.ppf(1 - significance / (2 * steps), rows, m.sample_rate))
    noise = m.noise_multiplier * (np.sqrt(audit.dimension) + np.sqrt(2 * np.log(2 * steps / significance)))
    largest = float(max(audit._sum_norms))
    checks["clipped_sum"] = {"measured": largest, "bound": batch + noise, "batch_bound": batch, "noise_bound": noise,
                             "fails": largest > batch + noise}
    for check in checks.values():
        check["fails"] = bool(check["fails"])
    return {"significance": significance, "checks": checks}


def canary_report(audit: CanaryAudit, delta: float, significance: float = 0.05) -> dict:
    """Everything a canary run found, as plain data (the run's canaries.json)."""
    m = audit.mechanism
    return {
        "canaries": audit.gradient, "canary_examples": audit.examples,
        "mechanism": {"sample_rate": m.sample_rate, "noise_multiplier": m.noise_multiplier, "steps": m.steps,
                      "clip_norm": m.sensitivity},
        "significance": significance, "threat_models": audit_canaries(audit, delta, significance),
        "mechanism_checks": measure_mechanism(audit),
    }


def canary_metrics(report: dict) -> dict[str, tuple[float, dict]]:
    """A canary run's metrics: the largest one-run bound (Bonferroni over the threat models, so it holds
    at the report's significance), each threat model's, and the number of failed mechanism checks."""
    bounds = report["threat_models"]
    checks = report["mechanism_checks"]
    metrics = {EPS_LB_CANARY: (max(b["epsilon"] for b in bounds.values()), {"significance": report["significance"]})}
    metrics |= {canary_eps_lb(kind): (b["epsilon"], b) for kind, b in bounds.items()}
    metrics[CANARY_FAILURES] = (float(sum(c["fails"] for c in checks["checks"].values())), checks)
    return metrics

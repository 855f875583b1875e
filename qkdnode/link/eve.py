"""Eve on the fibre: a proxy on the fibre byte stream that attacks the pulse descriptions.

Two attacks (``qkdnode.config.link.EveConfig``):

- **Intercept-resend** on a fraction of the pulses: Eve measures each chosen non-empty pulse in
  a uniformly random basis with an ideal detector (same basis: Alice's bit; other basis: a
  uniform bit) and resends one photon in her basis and result into the real fibre. On all
  pulses this gives a sifted QBER of 25 % (plus e_mis/2 for Bob's misalignment).
- **Photon-number splitting** (Brassard, Lütkenhaus, Mor, Sanders, PRL 85, 1330 (2000)): Eve
  replaces the fibre by her own channel of transmittance ``t`` (rewriting the frame's span
  transmittance), blocks a fraction ``b`` of the single-photon pulses, keeps one photon of every
  multi-photon pulse (undisturbed: she would measure it after basis reconciliation) and forwards
  the others. By default she picks (b, t) so that the *signal* gain equals the nominal
  1 − e^(−η μ1): with b < 1 and t = 1 when that is enough, else b = 1 and t < 1. The signal QBER
  is unchanged; the decoy and vacuum gains are not, which is what decoy states detect (Lo, Ma,
  Chen, PRL 94, 230504 (2005)).

The attacks are pure functions of an injected Generator; ``run_eve_proxy`` is the trio shell.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import trio

from qkdnode.config.link import EveConfig
from qkdnode.link.fibre import BlockStart, FibreDecoder, PulseFrame, encode_frame
from qkdnode.link.interface import LinkParameters
from qkdnode.link.physics import PHOTON_CAP, U8, photon_numbers, poisson_pmf, with_photon_numbers

_RECEIVE_MAX_BYTES = 1 << 20


def intercept_resend(pulses: U8, fraction: float, rng: np.random.Generator) -> U8:
    """Intercept-resend on each non-empty pulse with probability ``fraction``."""
    photons = photon_numbers(pulses)
    if fraction >= 1.0:
        chosen = np.flatnonzero(photons)
    else:
        chosen = np.flatnonzero((photons > 0) & (rng.random(pulses.shape[0]) < fraction))
    alice = pulses[chosen]
    eve_basis = rng.integers(0, 2, chosen.shape[0], dtype=np.uint8)
    guess = rng.integers(0, 2, chosen.shape[0], dtype=np.uint8)
    result = np.where(eve_basis == ((alice >> 1) & 1), alice & 1, guess).astype(np.uint8)
    attacked = pulses.copy()
    attacked[chosen] = (1 << 2) | (eve_basis << 1) | result
    return attacked


@dataclass(frozen=True, slots=True, kw_only=True)
class PnsPlan:
    """Eve's PNS choices for one span: single-photon block fraction and her channel's
    transmittance."""

    single_photon_block_fraction: float
    forward_transmittance: float


def pns_signal_gain(mu_signal: float, receiver_transmittance: float, plan: PnsPlan) -> float:
    """Photon part of the signal gain Bob sees under the PNS attack ``plan``:
    P1 (1 − b) t η_Bob + Σ_{n≥2} P_n (1 − (1 − t η_Bob)^(n−1))."""
    pmf = poisson_pmf(mu_signal)
    x = plan.forward_transmittance * receiver_transmittance
    n = np.arange(2, PHOTON_CAP + 1)
    multi = float(np.sum(pmf[2:] * (1.0 - (1.0 - x) ** (n - 1))))
    return float(pmf[1]) * (1.0 - plan.single_photon_block_fraction) * x + multi


def plan_pns(
    parameters: LinkParameters, span_transmittance: float, block_fraction: float | None
) -> PnsPlan:
    """Eve's plan: the given block fraction over a lossless channel, or (None) the plan that
    makes the signal gain equal the nominal 1 − exp(−span·η_Bob·μ1)."""
    if block_fraction is not None:
        return PnsPlan(single_photon_block_fraction=block_fraction, forward_transmittance=1.0)
    eta_bob = parameters.receiver_transmittance
    mu = parameters.mu_signal
    target = 1.0 - math.exp(-span_transmittance * eta_bob * mu)
    lossless = PnsPlan(single_photon_block_fraction=1.0, forward_transmittance=1.0)
    multi_only = pns_signal_gain(mu, eta_bob, lossless)
    if multi_only <= target:
        p1 = float(poisson_pmf(mu)[1])
        block = 1.0 - (target - multi_only) / (p1 * eta_bob) if p1 * eta_bob > 0 else 0.0
        return PnsPlan(
            single_photon_block_fraction=min(1.0, max(0.0, block)), forward_transmittance=1.0
        )
    low, high = 0.0, 1.0  # the multi-photon gain increases with t: bisect
    for _ in range(60):
        mid = 0.5 * (low + high)
        plan = PnsPlan(single_photon_block_fraction=1.0, forward_transmittance=mid)
        if pns_signal_gain(mu, eta_bob, plan) < target:
            low = mid
        else:
            high = mid
    return PnsPlan(single_photon_block_fraction=1.0, forward_transmittance=0.5 * (low + high))


def photon_number_split(pulses: U8, plan: PnsPlan, rng: np.random.Generator) -> U8:
    """Apply a PNS plan: block single photons with probability b, keep one photon of each
    multi-photon pulse. The frame's span must then be set to ``plan.forward_transmittance``."""
    photons = photon_numbers(pulses)
    forwarded = photons.copy()
    multi = photons >= 2
    forwarded[multi] -= 1
    singles = np.flatnonzero(photons == 1)
    blocked = singles[rng.random(singles.shape[0]) < plan.single_photon_block_fraction]
    forwarded[blocked] = 0
    return with_photon_numbers(pulses, forwarded)


class EveAttack:
    """Eve's attack on pulse frames, with her own Generator. Counters for the tests and demo."""

    def __init__(
        self, config: EveConfig, parameters: LinkParameters, rng: np.random.Generator
    ) -> None:
        self._config = config
        self._parameters = parameters
        self._rng = rng
        self._plans: dict[float, PnsPlan] = {}
        self.frames_attacked = 0
        self.photons_kept = 0

    def plan_for(self, span_transmittance: float) -> PnsPlan:
        plan = self._plans.get(span_transmittance)
        if plan is None:
            plan = plan_pns(
                self._parameters,
                span_transmittance,
                self._config.pns_single_photon_block_fraction,
            )
            self._plans[span_transmittance] = plan
        return plan

    def apply(self, frame: PulseFrame) -> PulseFrame:
        """The frame as Eve forwards it."""
        config = self._config
        if config.photon_number_splitting:
            plan = self.plan_for(frame.span_transmittance)
            pulses = photon_number_split(frame.pulses, plan, self._rng)
            self.photons_kept += int(np.count_nonzero(photon_numbers(frame.pulses) >= 2))
            span = plan.forward_transmittance
        elif config.intercept_resend_fraction > 0.0:
            pulses = intercept_resend(frame.pulses, config.intercept_resend_fraction, self._rng)
            span = frame.span_transmittance
        else:
            return frame
        self.frames_attacked += 1
        return PulseFrame(
            first_pulse_index=frame.first_pulse_index, span_transmittance=span, pulses=pulses
        )


async def run_eve_proxy(
    attack: EveAttack, upstream: trio.abc.ReceiveStream, downstream: trio.abc.SendStream
) -> None:
    """Forward fibre frames from Alice's side to Bob's side, attacking pulse frames, until the
    upstream closes; then close the downstream. Garbage upstream raises ``BadDeviceData``."""
    decoder = FibreDecoder()
    try:
        while True:
            data = await upstream.receive_some(_RECEIVE_MAX_BYTES)
            if not data:
                return
            decoder.receive_data(data)
            while (frame := decoder.next_frame()) is not None:
                if isinstance(frame, BlockStart):
                    await downstream.send_all(encode_frame(frame))
                else:
                    # the attack's physics off the event loop, like the link's own
                    attacked = await trio.to_thread.run_sync(attack.apply, frame)
                    await downstream.send_all(encode_frame(attacked))
    finally:
        await downstream.aclose()

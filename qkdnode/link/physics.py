"""Physics of the simulated decoy-state BB84 link: pure numpy, randomness from an injected rng.

Pulse description on the fibre, one byte per pulse (see ``qkdnode.link.fibre``):
``photons << 2 | basis << 1 | bit``, photon number clipped at ``PHOTON_CAP`` = 63 (the clipped
tail has probability < 1e-25 for mu <= 10, the configured maximum). The intensity class is *not*
on the fibre: nobody but Alice knows it, which is the point of decoy states.

Model (Lo, Ma, Chen, PRL 94, 230504 (2005); Ma et al., PRA 72, 012326 (2005)):

- Source: per pulse, intensity class with probabilities (p_signal, p_decoy, p_vacuum), basis 0
  with probability p_key_basis, uniform bit, Poisson photon number of the class's mean mu.
- Channel and receiver: every photon survives fibre, insertion loss and detector efficiency
  independently (binomial thinning with η = span transmittance × η_Bob). Thinning is sampled
  sparsely but exactly: the surviving photons of the whole chunk are drawn as geometric gaps
  over the concatenated photon sequence (a Bernoulli process), then mapped back to pulses.
- Bob chooses basis 0 with probability p_key_basis. Same basis as Alice: misalignment flips the
  arriving state of the whole pulse with probability e_mis and every detected photon goes to the
  detector of the (possibly flipped) bit. Other basis: each photon goes to either detector with
  probability 1/2, independently (a coherent state splits into two independent modes).
- Dark counts: each of the two detectors clicks in each gate with probability p_dc,
  independently (sparse Bernoulli process over gates).
- After-pulsing (simple model): a detector that clicked in gate i clicks in gate i + 1 with
  probability p_ap if it would not click there anyway; after-pulses can chain. The state of the
  last gate of a chunk carries to the next chunk.
- A gate with a click in both detectors gets a uniformly random bit (double-click resolution).

With this model a pulse of intensity μ gives a click with probability 1 − (1 − p_dc)² e^(−ημ),
i.e. Q_μ = Y0 + 1 − e^(−ημ) up to a Y0·(1 − e^(−ημ)) term, and E_μ Q_μ = e0 Y0 +
e_mis (1 − e^(−ημ)) up to double-click corrections of order p_dc (Ma et al., eqs. 3–4).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

import numpy as np
from numpy.typing import NDArray

from qkdnode.link.interface import LinkParameters
from qkdnode.postprocess.records import check_offsets

PHOTON_CAP: Final = 63
_SHIFT_PHOTONS: Final = 2
_AMBIGUOUS: Final = 0xFF  # class 3 does not exist, so this code marks a bucket straddling outcomes
_BUCKET_BITS: Final = 16
_GEOMETRIC_MAX_P: Final = 0.25  # above this a dense Bernoulli draw is cheaper than geometric gaps

U8 = NDArray[np.uint8]
I64 = NDArray[np.int64]


def encode_pulses(photons: U8, basis: U8, bit: U8) -> U8:
    """Pack pulse descriptions into fibre bytes (photon numbers already <= PHOTON_CAP)."""
    return ((photons << _SHIFT_PHOTONS) | (basis << 1) | bit).astype(np.uint8, copy=False)


def photon_numbers(pulses: U8) -> U8:
    return (pulses >> _SHIFT_PHOTONS).astype(np.uint8, copy=False)


def with_photon_numbers(pulses: U8, photons: U8) -> U8:
    """The same polarisation states carrying other photon numbers (clipped at PHOTON_CAP)."""
    clipped = np.minimum(photons, PHOTON_CAP).astype(np.uint8)
    return ((clipped << _SHIFT_PHOTONS) | (pulses & 3)).astype(np.uint8, copy=False)


def poisson_pmf(mu: float, cap: int = PHOTON_CAP) -> NDArray[np.float64]:
    """P(n) for n = 0..cap of a Poisson(mu) distribution, the tail folded into n = cap."""
    pmf = np.empty(cap + 1)
    term = math.exp(-mu)
    for n in range(cap + 1):
        pmf[n] = term
        term *= mu / (n + 1)
    pmf[cap] = max(0.0, 1.0 - float(pmf[:cap].sum()))
    return pmf


@dataclass(frozen=True, slots=True, kw_only=True)
class Emission:
    """Alice's choices for a run of pulses and the fibre bytes that describe them."""

    bit: U8
    basis: U8
    intensity: U8
    pulses: U8

    def __repr__(self) -> str:  # the arrays are key material
        return f"Emission(pulse_count={self.pulses.shape[0]})"


class Source:
    """Alice's weak-coherent-pulse source with three intensities and a biased basis choice.

    Sampling uses one 64-bit raw draw per pulse: bit 0 is the bit, bits 1–31 choose the basis
    (P(basis 0) = round(p_key·2^31)/2^31), bits 32–63 choose (intensity class, photon number)
    jointly by inverse CDF with 2^-32 resolution, through a 2^16-bucket table (exact: buckets
    that straddle two outcomes fall back to a binary search).
    """

    __slots__ = ("_basis_threshold", "_bucket_code", "_codes", "_thresholds")

    def __init__(self, params: LinkParameters) -> None:
        joint: list[NDArray[np.float64]] = []
        codes: list[NDArray[np.uint8]] = []
        for cls, (mu, p) in enumerate(
            zip(params.intensities, params.intensity_probabilities, strict=True)
        ):
            joint.append(p * poisson_pmf(mu))
            codes.append(((cls << 6) | np.arange(PHOTON_CAP + 1)).astype(np.uint8))
        probabilities = np.concatenate(joint)
        scale = float(1 << 32)
        cumulative = np.cumsum(probabilities) / probabilities.sum()
        thresholds = np.rint(cumulative * scale).astype(np.uint64)
        thresholds[-1] = np.uint64(1 << 32)
        self._thresholds = thresholds
        self._codes = np.concatenate(codes)
        bucket_width = 1 << (32 - _BUCKET_BITS)
        low = np.arange(1 << _BUCKET_BITS, dtype=np.uint64) * np.uint64(bucket_width)
        first = np.searchsorted(thresholds, low, side="right")
        last = np.searchsorted(thresholds, low + np.uint64(bucket_width - 1), side="right")
        bucket = self._codes[np.minimum(first, self._codes.shape[0] - 1)]
        self._bucket_code = np.where(first == last, bucket, np.uint8(_AMBIGUOUS)).astype(np.uint8)
        self._basis_threshold = np.uint64(round(params.p_key_basis * (1 << 31)))

    def emit(self, count: int, rng: np.random.Generator) -> Emission:
        """Alice's choices and the fibre bytes of ``count`` consecutive pulses."""
        bit, basis, intensity, photons = self.choices(rng.bit_generator.random_raw(count))
        return Emission(
            bit=bit, basis=basis, intensity=intensity, pulses=encode_pulses(photons, basis, bit)
        )

    def choices(self, raw: NDArray[np.uint64]) -> tuple[U8, U8, U8, U8]:
        """(bit, basis, intensity, photon number) of the pulses drawn as ``raw``, one raw
        64-bit draw per pulse (the whole of a pulse's randomness: see the class docstring)."""
        bit = (raw & np.uint64(1)).astype(np.uint8)
        basis = (((raw >> np.uint64(1)) & np.uint64(0x7FFFFFFF)) >= self._basis_threshold).astype(
            np.uint8
        )
        upper = raw >> np.uint64(32)
        code = self._bucket_code[upper >> np.uint64(32 - _BUCKET_BITS)]
        ambiguous = np.flatnonzero(code == _AMBIGUOUS)
        if ambiguous.size:
            outcome = np.searchsorted(self._thresholds, upper[ambiguous], side="right")
            code[ambiguous] = self._codes[outcome]
        return bit, basis, code >> 6, code & np.uint8(PHOTON_CAP)


class RedrawnEmissions:
    """Alice's records of one block of a ``Source`` held as the state of its random generator
    at the block's first pulse (an ``EmissionLookup``: no per-pulse array).

    Each pulse takes exactly one raw draw of the generator, so the records of the pulses Bob
    announced are drawn again from that state when sifting asks for them, chunk by chunk
    (``chunk_pulses`` raw draws held at a time) and kept at the asked offsets only: they are,
    bit for bit, those of the pulses that went out on the fibre. The generator that emits the
    block is not touched (the state is copied), so this may run in another thread.
    """

    __slots__ = ("_bit_generator", "_chunk_pulses", "_first", "_pulses", "_source", "_state")

    def __init__(
        self,
        source: Source,
        rng: np.random.Generator,
        *,
        first_pulse_index: int,
        pulse_count: int,
        chunk_pulses: int = 1 << 22,
    ) -> None:
        if first_pulse_index < 0 or pulse_count < 0 or chunk_pulses < 1:
            raise ValueError("first_pulse_index, pulse_count >= 0 and chunk_pulses >= 1")
        self._source = source
        self._bit_generator = type(rng.bit_generator)
        self._state = rng.bit_generator.state
        self._first = first_pulse_index
        self._pulses = pulse_count
        self._chunk_pulses = chunk_pulses

    @property
    def first_pulse_index(self) -> int:
        return self._first

    @property
    def pulse_count(self) -> int:
        return self._pulses

    def records_at(self, offsets: I64) -> tuple[U8, U8, U8]:
        """(bit, basis, intensity) of the pulses at ``offsets`` (strictly increasing)."""
        check_offsets(offsets, self._pulses)
        generator = self._bit_generator()
        generator.state = self._state
        bit = np.empty(offsets.shape[0], dtype=np.uint8)
        basis = np.empty_like(bit)
        intensity = np.empty_like(bit)
        end = int(offsets[-1]) + 1 if offsets.size else 0
        bounds = np.searchsorted(
            offsets, np.arange(0, end + self._chunk_pulses, self._chunk_pulses)
        )
        for chunk, start in enumerate(range(0, end, self._chunk_pulses)):
            raw = generator.random_raw(min(self._chunk_pulses, end - start))
            lo, hi = int(bounds[chunk]), int(bounds[chunk + 1])
            picked = self._source.choices(raw[offsets[lo:hi] - start])
            bit[lo:hi], basis[lo:hi], intensity[lo:hi] = picked[0], picked[1], picked[2]
        return bit, basis, intensity

    def __repr__(self) -> str:  # the generator's state is key material
        return f"RedrawnEmissions(first_pulse_index={self._first}, pulse_count={self._pulses})"


def bernoulli_positions(trials: int, p: float, rng: np.random.Generator) -> I64:
    """Sorted indices of the successes among ``trials`` independent Bernoulli(p) trials.

    Sparse for small p: gaps between successes are geometric, so the cost is proportional to
    the number of successes, not of trials.
    """
    if trials <= 0 or p <= 0.0:
        return np.empty(0, dtype=np.int64)
    if p >= 1.0:
        return np.arange(trials, dtype=np.int64)
    if p > _GEOMETRIC_MAX_P:
        return np.flatnonzero(rng.random(trials) < p).astype(np.int64)
    expected = trials * p
    parts: list[I64] = []
    end = -1
    while end < trials - 1:
        draws = int(expected + 6.0 * math.sqrt(expected) + 16)
        positions = np.cumsum(rng.geometric(p, draws), dtype=np.int64) + end
        parts.append(positions)
        end = int(positions[-1])
    result = np.concatenate(parts) if len(parts) > 1 else parts[0]
    return result[: int(np.searchsorted(result, trials))]


@dataclass(frozen=True, slots=True, kw_only=True)
class Detections:
    """Bob's detections in a run of gates: offsets from the run's first pulse, basis, bit."""

    offset: I64
    basis: U8
    bit: U8

    def __repr__(self) -> str:  # the bits are key material
        return f"Detections(count={self.offset.shape[0]})"


@dataclass(frozen=True, slots=True, kw_only=True)
class AfterpulseCarry:
    """Whether each detector clicked in the last gate of the previous run."""

    detector0: bool = False
    detector1: bool = False


class Receiver:
    """Bob's passive-loss receiver: basis choice, two threshold detectors, dark counts,
    after-pulsing and misalignment (see the module docstring for the model)."""

    __slots__ = (
        "_afterpulse",
        "_dark_count",
        "_misalignment",
        "_p_key_basis",
        "_receiver_transmittance",
    )

    def __init__(self, params: LinkParameters) -> None:
        self._receiver_transmittance = params.receiver_transmittance
        self._p_key_basis = params.p_key_basis
        self._dark_count = params.dark_count_probability_per_gate
        self._afterpulse = params.afterpulse_probability
        self._misalignment = params.misalignment_error

    def detect(
        self,
        pulses: U8,
        span_transmittance: float,
        rng: np.random.Generator,
        carry: AfterpulseCarry,
    ) -> tuple[Detections, AfterpulseCarry]:
        """Detections of a run of pulses that still cross a span of ``span_transmittance``."""
        gates = int(pulses.shape[0])
        eta = min(1.0, max(0.0, span_transmittance * self._receiver_transmittance))
        photons = photon_numbers(pulses)
        if eta >= 1.0:
            hit = np.flatnonzero(photons).astype(np.int64)
            arrived = photons[hit].astype(np.int64)
        else:
            cumulative = np.cumsum(photons, dtype=np.int64)
            total = int(cumulative[-1]) if gates else 0
            survivors = bernoulli_positions(total, eta, rng)
            owner = np.searchsorted(cumulative, survivors, side="right").astype(np.int64)
            starts = np.flatnonzero(np.diff(owner, prepend=np.int64(-1)))
            hit = owner[starts]
            arrived = np.diff(np.append(starts, owner.shape[0])).astype(np.int64)
        count = hit.shape[0]
        bob_basis = (rng.random(count) >= self._p_key_basis).astype(np.uint8)
        alice = pulses[hit]
        same_basis = bob_basis == ((alice >> 1) & 1)
        u = rng.random(count)  # misalignment flip if same basis, photon routing otherwise
        target = (alice & 1) ^ (u < self._misalignment)
        all_to_0 = np.ldexp(1.0, -arrived)  # 2^-k: every photon went to detector 0
        click0 = np.where(same_basis, target == 0, (u < all_to_0) | (u >= 2.0 * all_to_0))
        click1 = np.where(same_basis, target == 1, u >= all_to_0)
        detector0 = np.union1d(hit[click0], bernoulli_positions(gates, self._dark_count, rng))
        detector1 = np.union1d(hit[click1], bernoulli_positions(gates, self._dark_count, rng))
        detector0 = self._afterpulses(detector0, gates, carry.detector0, rng)
        detector1 = self._afterpulses(detector1, gates, carry.detector1, rng)
        clicked = np.union1d(detector0, detector1)
        in0 = np.isin(clicked, detector0, assume_unique=True)
        in1 = np.isin(clicked, detector1, assume_unique=True)
        bit = in1.astype(np.uint8)
        double = np.flatnonzero(in0 & in1)
        bit[double] = rng.integers(0, 2, double.shape[0], dtype=np.uint8)
        # Gates with only dark counts or after-pulses get a fresh, independent basis choice.
        basis = np.asarray(rng.random(clicked.shape[0]) >= self._p_key_basis).astype(np.uint8)
        basis[np.searchsorted(clicked, hit)] = bob_basis
        new_carry = AfterpulseCarry(
            detector0=bool(detector0.size and detector0[-1] == gates - 1),
            detector1=bool(detector1.size and detector1[-1] == gates - 1),
        )
        return Detections(offset=clicked.astype(np.int64), basis=basis, bit=bit), new_carry

    def _afterpulses(self, clicks: I64, gates: int, carried: bool, rng: np.random.Generator) -> I64:
        if self._afterpulse <= 0.0 or gates == 0:
            return clicks
        fresh = clicks
        seed = np.array([-1], dtype=np.int64) if carried else np.empty(0, dtype=np.int64)
        candidates = np.concatenate((seed, fresh)) + 1
        while candidates.size:
            candidates = candidates[candidates < gates]
            fired = candidates[rng.random(candidates.shape[0]) < self._afterpulse]
            fired = np.setdiff1d(fired, clicks, assume_unique=True)
            if not fired.size:
                break
            clicks = np.union1d(clicks, fired)
            candidates = fired + 1
        return clicks

"""Disclosing the error positions W = X xor Y, checked on exact states.

Two-way Cascade discloses W (``qkdnode.postprocess.leakage``). The decoy bound keeps the
single-photon term s_X1 (1 - h(phi)) and drops the vacuum term (``keylength.decoy``, step 4).
Both steps are checked here by computing H(X | E W) from von Neumann entropies of explicit
states, independently of any paper:

- single photons under a collective attack: Eve holds the purification of a Bell-diagonal
  two-qubit state (BB84's symmetrisation brings every collective attack to one). She already
  knows W (the Bell index tells it), so announcing it costs nothing; the entropy left is never
  below 1 - h(e_phase), and equals it for some states, so the single-photon term stays as it is
  and cannot be raised;
- vacuum rounds: Bob's bit may be Eve's; then W hands her Alice's bit, so those rounds give
  no key once W is public.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
import pytest

Matrix = npt.NDArray[np.complex128]

# |Phi+>, |Phi->, |Psi+>, |Psi-> over |00>, |01>, |10>, |11> (index 2a + b)
_BELL = np.array(
    [[1, 0, 0, 1], [1, 0, 0, -1], [0, 1, 1, 0], [0, 1, -1, 0]], dtype=np.complex128
) / math.sqrt(2)
_HADAMARD = np.array([[1, 1], [1, -1]], dtype=np.complex128) / math.sqrt(2)


def _entropy_bits(rho: Matrix) -> float:
    eigenvalues = np.linalg.eigvalsh(rho)
    eigenvalues = eigenvalues[eigenvalues > 1e-15]
    return float(-(eigenvalues * np.log2(eigenvalues)).sum())


def _binary_entropy(p: float) -> float:
    if p <= 0.0 or p >= 1.0:
        return 0.0
    return -p * math.log2(p) - (1 - p) * math.log2(1 - p)


def _x_given_e_and_w(eve_states: dict[tuple[int, int], Matrix]) -> float:
    """H(X | E W) of the state sum_xy |x><x| (x) |x^y><x^y| (x) rho_E(x, y) (unnormalised
    rho_E(x, y): its trace is P(x, y))."""
    dim = next(iter(eve_states.values())).shape[0]
    xwe = np.zeros((4 * dim, 4 * dim), dtype=np.complex128)
    we = np.zeros((2 * dim, 2 * dim), dtype=np.complex128)
    for (x, y), rho in eve_states.items():
        w = x ^ y
        block = (2 * x + w) * dim
        xwe[block : block + dim, block : block + dim] += rho
        we[w * dim : (w + 1) * dim, w * dim : (w + 1) * dim] += rho
    return _entropy_bits(xwe) - _entropy_bits(we)


def _x_given_e(eve_states: dict[tuple[int, int], Matrix]) -> float:
    """H(X | E) of the same state, W kept private."""
    dim = next(iter(eve_states.values())).shape[0]
    xe = np.zeros((2 * dim, 2 * dim), dtype=np.complex128)
    for (x, _y), rho in eve_states.items():
        xe[x * dim : (x + 1) * dim, x * dim : (x + 1) * dim] += rho
    e = xe[:dim, :dim] + xe[dim:, dim:]
    return _entropy_bits(xe) - _entropy_bits(e)


def _purified_bell_diagonal(weights: npt.NDArray[np.float64]) -> npt.NDArray[np.complex128]:
    """sum_i sqrt(weights_i) |Bell_i>_AB |i>_E as a vector indexed (2a + b) * 4 + e."""
    psi = np.zeros(16, dtype=np.complex128)
    for i, weight in enumerate(weights):
        psi += math.sqrt(weight) * np.kron(_BELL[i], np.eye(4)[i])
    return psi


def _key_basis_states(psi: npt.NDArray[np.complex128]) -> dict[tuple[int, int], Matrix]:
    """Eve's unnormalised states after Alice and Bob measure their key basis (Z) and get x, y."""
    amplitudes = psi.reshape(4, 4)  # row 2x + y, column e
    return {
        (x, y): np.outer(amplitudes[2 * x + y], amplitudes[2 * x + y].conj())
        for x in (0, 1)
        for y in (0, 1)
    }


def _error_rates(psi: npt.NDArray[np.complex128]) -> tuple[float, float]:
    """(bit error rate in the key basis, phase error rate: errors in the other basis)."""
    key = np.abs(psi.reshape(4, 4)) ** 2
    rotated = np.kron(np.kron(_HADAMARD, _HADAMARD), np.eye(4)) @ psi
    test = np.abs(rotated.reshape(4, 4)) ** 2
    return float(key[1].sum() + key[2].sum()), float(test[1].sum() + test[2].sum())


def test_single_photon_entropy_with_w_public_is_at_least_one_minus_h_of_phase_error() -> None:
    rng = np.random.default_rng(16)
    for _ in range(400):
        weights = rng.dirichlet(np.full(4, 0.3))
        psi = _purified_bell_diagonal(weights)
        _, phase_error = _error_rates(psi)
        states = _key_basis_states(psi)
        with_w = _x_given_e_and_w(states)
        assert with_w >= 1.0 - _binary_entropy(phase_error) - 1e-9, weights
        # Eve holding the purification knows the Bell index, hence W, already
        assert with_w == pytest.approx(_x_given_e(states), abs=1e-9)


@pytest.mark.parametrize(("bit_error", "phase_error"), [(0.02, 0.03), (0.05, 0.05), (0.1, 0.2)])
def test_the_single_photon_bound_is_attained_so_it_cannot_be_raised(
    bit_error: float, phase_error: float
) -> None:
    # independent bit and phase flips: Bell weights (1-b)(1-f), (1-b) f, b (1-f), b f
    b, f = bit_error, phase_error
    weights = np.array([(1 - b) * (1 - f), (1 - b) * f, b * (1 - f), b * f])
    psi = _purified_bell_diagonal(weights)
    measured_bit, measured_phase = _error_rates(psi)
    assert measured_bit == pytest.approx(b, abs=1e-12)
    assert measured_phase == pytest.approx(f, abs=1e-12)
    assert _x_given_e_and_w(_key_basis_states(psi)) == pytest.approx(
        1.0 - _binary_entropy(f), abs=1e-9
    )


def test_depolarised_photons_keep_more_than_the_bound() -> None:
    p = 0.1
    psi = _purified_bell_diagonal(np.array([1 - 3 * p / 4, p / 4, p / 4, p / 4]))
    _, phase_error = _error_rates(psi)
    assert _x_given_e_and_w(_key_basis_states(psi)) > 1.0 - _binary_entropy(phase_error) + 1e-3


def test_a_vacuum_round_gives_eve_alices_bit_once_w_is_public() -> None:
    # Alice's bit is uniform and private; Bob's click is Eve's: she holds a copy of his bit.
    states = {
        (x, y): 0.25 * np.diag([1.0 - y, float(y)]).astype(np.complex128)
        for x in (0, 1)
        for y in (0, 1)
    }
    assert _x_given_e(states) == pytest.approx(1.0, abs=1e-12)
    assert _x_given_e_and_w(states) == pytest.approx(0.0, abs=1e-12)

"""Settings shared by the finite-key tests: the decoy intensities and probabilities, and the
security parameters, of Lim et al., PRA 89, 022307 (2014)."""

from __future__ import annotations

from qkdnode.postprocess.finitekey import DecoySettings, SecurityParameters

SETTINGS = DecoySettings(
    mu_signal=0.5,
    mu_decoy=0.15,
    mu_vacuum=2e-4,
    p_signal=0.7,
    p_decoy=0.2,
    p_vacuum=0.1,
    p_key_basis=0.9,
)
LIM_SECURITY = SecurityParameters(eps_sec=1e-10, eps_cor=1e-15)

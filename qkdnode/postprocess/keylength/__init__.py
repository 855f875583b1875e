"""Finite-key secret-key length: one module per analysis, plus the shared theory model.

- ``common``: entropy, validation, security parameters, decoy settings and observations;
- ``tomamichel2012``: single-photon BB84;
- ``decoy``: the decoy-state estimation Lim et al. 2014 Eqs. (1)-(5), shared by:
- ``lim2014`` (Hoeffding deviations), ``lim2014_chernoff`` (per-class Chernoff deviations) and
  ``lim2014_kl`` (per-class relative-entropy Hoeffding deviations);
- ``one_decoy``: one-decoy BB84 (two intensities), Rusca et al. 2018 Appendix A (A16)-(A25),
  theory and optimiser, with the statistics of any of the three above;
- ``selection``: from a ``FiniteKeyAnalysis`` to its bound;
- ``theory``: channel model and expected counts, theory curves, PLOB bound;
- ``optimiser``: decoy-setting optimisation for a selected analysis.

``qkdnode.postprocess.finitekey`` re-exports the public names and selects the analysis.
"""

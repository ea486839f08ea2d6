"""Quicksilver (Yang, Kwitt, Styner, Niethammer 2017): patch-wise prediction of the initial LDDMM
momentum, a correction network, and a probabilistic (Monte-Carlo dropout) variant.

Modules: `network` (the patch network), `patches` (split and reassembly), `targets` (the HDF5
cache of optimised momenta), `predict` (whole-image prediction, correction, shooting). The LDDMM
mathematics lives in `tfreg.ops.lddmm`. Not yet exposed as a trainable ``tfreg.methods`` entry
point (see docs/quicksilver.md).
"""

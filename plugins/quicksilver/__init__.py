"""Quicksilver (Yang, Kwitt, Styner, Niethammer 2017): patch-wise prediction of the initial LDDMM
momentum, a correction network, and a probabilistic (Monte-Carlo dropout) variant.

This package currently holds the network (`network.build_network`) and the patch split and
reassembly (`patches`); the LDDMM mathematics lives in `tfreg.ops.lddmm`. It is not yet exposed
as a trainable ``tfreg.methods`` entry point.
"""

"""QCOW2, written from QEMU's docs/interop/qcow2.rst: ``format`` (constants, header),
``encoder`` (streaming v3 writer), ``decoder`` (validating reader). No I/O here."""

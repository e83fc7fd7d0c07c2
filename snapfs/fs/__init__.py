"""The mount: the snapshot service as a directory tree (pyfuse3 + trio).

``keys``/``names``/``inodes`` hold the pure tree rules, ``catalog`` the cached view
of the service, ``nodes/`` one module per kind of place, ``ops`` the pyfuse3
Operations (the one place refusals become errnos), ``daemon`` and ``commands``
the ``snapfs mount``/``umount``/``wait`` commands.
"""

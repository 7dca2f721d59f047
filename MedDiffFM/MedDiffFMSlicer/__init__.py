"""Parts of the MedDiffFM Slicer module that need no Qt: task descriptions, MRML <-> volume conversion,
the task logic, the child-process runner, model management and dependency checks.

Nothing is imported here on purpose: ``taskinfo`` and ``dependencies`` work before torch and the other
Python packages are installed; ``nodes``, ``logic`` and ``models`` import MedDiffFMLib (and so torch);
``runner`` imports neither Qt nor Slicer. All of them run inside Slicer, in
``Slicer --no-main-window --python-script`` and headlessly with the ``slicer-core`` package (the tests).
"""

"""The merge engine as a package: planning and validation (:mod:`.plan`), the pretrained-base case
(:mod:`.pretrained`), execution block by block (:mod:`.execute`) and writing (:mod:`.write`). The entry point is
:func:`gradmatch.merge.merge`."""

"""The runtime image of the docker runtime, built offline.

Two layers, so a change to edgepack's code rebuilds seconds of work, not minutes:

- the **base** (:mod:`~packager.runtime_image.rootfs`): Debian minbase with python3 and the
  pinned wheels in a venv, made with debootstrap and ``pip download`` on the host and
  ``docker import``-ed as ``edgepack/runtime-base:<key>``; ``<key>`` hashes every input
  (:class:`~packager.runtime_image.recipe.BaseRecipe`), so it is built once per recipe;
- the **thin layer**: the edgepack wheel, ``docker build`` FROM the base, the scoring server
  as entry point, run as uid 10001; found again by a label that hashes the base, its
  Dockerfile and edgepack's source.

:func:`~packager.runtime_image.builder.build_runtime_image` does both (and the push);
``edgepack runtime-image build`` is its command and ``docs/runtime-image.md`` its guide.
:mod:`~packager.runtime_image.pinning` turns a tag into the digest a module records.
"""

"""Ray jobs: each module is ``python -m jobs.<name>`` with a ``<Job>Config`` dataclass and
``main(cfg)``. This is the only package that imports Ray; shared pieces: `config` (flags,
presets, config files), `storage` (URLs to filesystems), `runtime` (Ray, device, seeds),
`models` (the ``--model URL`` convention) and `dataset` (the prepared-data layout)."""

"""One module per data source; each exposes ``load(name, data_dir, split_names, **kwargs) -> SourceData``.

A loader that finds no data raises ``records.DataNotFoundError`` (a
``FileNotFoundError``) saying where it looked, so that ``source='auto'`` can
move on; data that is found but bad raises ``ValueError`` naming the file.
"""

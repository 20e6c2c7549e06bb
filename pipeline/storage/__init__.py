"""What every concern stands on: the retry policy of storage calls (`retry`), the output's lease (`lease`) and
files (`output`), and the one reader of datasets: `listing` (files, shards and their keys), `formats` (reading them,
streamed and retried) and `pairs` (labelled image-mask pairs on that reader). Imports nothing else of `pipeline`."""

"""Object Storage over S3 (boto3): ``config`` (where and how: boto3's own
configuration, ``--s3-endpoint``, the Scaleway fallback),
``calls`` (every boto3 call: thread + limiter, retries with backoff, error mapping),
``export`` (streamed multipart QCOW2 upload), ``reader`` (ranged-GET QCOW2 import
reader) and ``storage`` (the ObjectStorage the services use, and
``object_storage_from_config`` that makes it)."""

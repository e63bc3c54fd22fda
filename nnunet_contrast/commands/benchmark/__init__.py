"""The label-efficiency benchmark: runs (``runs``), their records (``records``) and the report (``report``)."""

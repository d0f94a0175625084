"""Networks: tensors in, tensors out (the SaShiMi backbone and its blocks); no losses, no sampling, no data."""

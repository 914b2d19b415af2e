"""A pure-Python KVM userspace and the conformance oracle that compares real KVM with the model."""

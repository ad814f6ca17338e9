"""The frozen-feature cache: vision features computed once, trained from many times."""

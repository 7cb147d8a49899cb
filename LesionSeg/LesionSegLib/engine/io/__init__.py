"""Reading, validating and writing CT volumes, and the preprocessing shared by training and inference."""

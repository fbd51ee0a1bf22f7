"""Book a trip: a saga that holds a hotel, a flight and a car, then parks until the bank
says whether the card was charged (``python -m examples.trip``; see examples/README.md)."""

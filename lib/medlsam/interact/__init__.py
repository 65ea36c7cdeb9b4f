"""Interactive editing: clicks, the click refiner, geodesic edits, propagation, the click simulator."""

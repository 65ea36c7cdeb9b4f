"""Template banks: template landmarks and organ priors, calibration, localisation of organs in a new scan."""

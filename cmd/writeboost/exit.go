package main

import "errors"

// exitError carries a specific exit status: `writeboost check` exits 1 on
// corruption, distinct from 2 for a failure to run the check at all.
type exitError struct {
	code int
	err  error
}

func (e *exitError) Error() string { return e.err.Error() }
func (e *exitError) Unwrap() error { return e.err }

func exitCode(err error) int {
	var ee *exitError
	if errors.As(err, &ee) {
		return ee.code
	}
	return 1
}

// Package cleanup is an explicit undo stack for operations that create several resources:
// each step that succeeds pushes its undo, a failure half-way runs them in reverse, and
// success releases them. One stack per operation replaces a ladder of error defers.
//
//	var undo cleanup.Stack
//	defer undo.Run()
//	dir, err := mkdir(...)
//	if err != nil { return err }
//	undo.Add("remove "+dir, func() error { return os.RemoveAll(dir) })
//	...
//	undo.Release() // success: keep everything
package cleanup

import (
	"errors"
	"fmt"
	"sync"
)

// Stack is safe for concurrent use. The zero value is an empty stack.
type Stack struct {
	mu    sync.Mutex
	steps []step
}

type step struct {
	name string
	fn   func() error
}

// Add pushes an undo step; name says what it undoes, for the error Run returns.
func (s *Stack) Add(name string, fn func() error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.steps = append(s.steps, step{name, fn})
}

// Release forgets every step: the operation succeeded and keeps what it made.
func (s *Stack) Release() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.steps = nil
}

// Run runs the steps last-in first-out, every one of them even if some fail, and returns
// their errors joined. The stack is empty afterwards.
func (s *Stack) Run() error {
	s.mu.Lock()
	steps := s.steps
	s.steps = nil
	s.mu.Unlock()
	var errs []error
	for i := len(steps) - 1; i >= 0; i-- {
		if err := steps[i].fn(); err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", steps[i].name, err))
		}
	}
	return errors.Join(errs...)
}

// Len is the number of pending steps.
func (s *Stack) Len() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.steps)
}

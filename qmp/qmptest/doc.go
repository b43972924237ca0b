// Package qmptest helps test code that drives QEMU over QMP: a scripted fake QMP
// server for unit tests, and helpers that start a real QEMU (and a minimal guest)
// for integration tests gated by VMPOD_INTEGRATION=1.
package qmptest

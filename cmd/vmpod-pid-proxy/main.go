// vmpod-pid-proxy stands on the host for a container of a vmpod container pod: its pid
// is the one containerd reports, signals sent to it reach the container's init
// (runtime/pidproxy). The shim starts one per container; it is never run by hand.
package main

import "github.com/vmpod/vmpod/runtime/pidproxy"

func main() { pidproxy.Main() }

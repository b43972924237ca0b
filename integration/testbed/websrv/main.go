// Command websrv stands in for the nginx and httpd images critest runs (the upstream
// images cannot be pulled offline). It serves a page over HTTP, optionally writes a pid
// file, and can re-exec itself under another argv[0]: critest looks for "nginx: master
// process" in /proc/1/cmdline and for a process named nginx.
package main

import (
	"flag"
	"fmt"
	"net/http"
	"os"
	"strconv"
	"strings"
	"syscall"
)

func main() {
	addr := flag.String("listen", ":80", "listen address")
	pidfile := flag.String("pidfile", "", "write the pid to this file")
	name := flag.String("name", "websrv", "server name, printed in the log and the page")
	title := flag.String("title", "", "re-exec with this argv[0] (nginx shows \"nginx: master process ...\")")
	flag.Parse()

	if *title != "" && !strings.HasPrefix(os.Args[0], *title) {
		exe, err := os.Executable()
		if err == nil {
			err = syscall.Exec(exe, append([]string{*title}, os.Args[1:]...), os.Environ())
		}
		fmt.Fprintln(os.Stderr, "re-exec:", err)
		os.Exit(1)
	}
	if *pidfile != "" {
		if err := os.WriteFile(*pidfile, []byte(strconv.Itoa(os.Getpid())+"\n"), 0o644); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
	}
	fmt.Printf("%s: serving on %s\n", *name, *addr)
	http.HandleFunc("/", func(w http.ResponseWriter, _ *http.Request) {
		fmt.Fprintf(w, "<html><body><h1>Welcome to %s!</h1></body></html>\n", *name)
	})
	if err := http.ListenAndServe(*addr, nil); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}

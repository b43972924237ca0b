package network

import "fmt"

// maxLinkName is IFNAMSIZ (16) less the terminating NUL.
const maxLinkName = 15

// tapName names the tap for the i-th plan interface: "tap<i>_<link>", cut to 15 bytes.
// The index keeps names distinct when links share a long prefix ("tap1_" and "tap12_"
// differ before any cut); the link name tells a human which link the tap mirrors.
func tapName(i int, link string) string {
	name := fmt.Sprintf("tap%d_%s", i, link)
	if len(name) > maxLinkName {
		name = name[:maxLinkName]
	}
	return name
}

//! Istio YAML fixtures that several test crates route with, one copy each.

/// `catalog` in namespace `shop` (a ServiceEntry on port 80, HTTP), its
/// subsets v1 and v2 by the label `version`, and a VirtualService sending
/// all of its traffic to `subset`: writing it again with the other subset
/// changes the route config mesh-control pushes, and nothing else.
pub fn catalog_routed_to(subset: &str) -> String {
    format!(
        r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: catalog, namespace: shop}}
spec:
  hosts: [catalog]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: STATIC
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: catalog, namespace: shop}}
spec:
  host: catalog
  subsets:
  - {{name: v1, labels: {{version: v1}}}}
  - {{name: v2, labels: {{version: v2}}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: catalog, namespace: shop}}
spec:
  hosts: [catalog]
  http:
  - route: [{{destination: {{host: catalog, subset: {subset}}}, weight: 100}}]
"#
    )
}
